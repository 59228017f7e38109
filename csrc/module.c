/*
 * module.c: the Python module `mcmi_torch._C`: importing it loads this shared
 * library and its op registrations. It holds one constant, the kernels'
 * centroid row-sum tolerance (mcmi.h), for the Python checks of given
 * centroids. Limited API only: one build serves every CPython >= 3.9.
 */
#include <Python.h>

#include "mcmi.h"

static struct PyModuleDef mcmi_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Kernels of mcmi_torch (see torch.ops.mcmi).",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject *module = PyModule_Create(&mcmi_module);
  if (module == NULL) {
    return NULL;
  }
  PyObject *tolerance = PyFloat_FromDouble(MCMI_CENTROID_SUM_TOLERANCE);
  if (tolerance == NULL ||
      PyModule_AddObject(module, "CENTROID_SUM_TOLERANCE", tolerance) < 0) {
    Py_DecRef(tolerance);
    Py_DecRef(module);
    return NULL;
  }
  return module;
}
