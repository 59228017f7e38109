/*
 * module.c: the Python module `mcmi_torch._C`: importing it loads this shared
 * library and its op registrations. It holds one constant, the kernels'
 * centroid row-sum tolerance (mcmi.h), for the Python checks of given
 * centroids, and the choice of the CPU kernels' instruction set
 * (mcmi_torch/_isa.py). Limited API only: one build serves every CPython >=
 * 3.9.
 */
#include <Python.h>

#include <string.h>

#include "mcmi.h"

/* cpu_isa() -> the name of the instruction set the CPU kernels run. */
static PyObject *cpu_isa(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  return PyUnicode_FromString(mcmi_cpu_isa_name(mcmi_cpu_get_isa()));
}

/* cpu_isas() -> {name: supported} for every instruction set, best first. */
static PyObject *cpu_isas(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  PyObject *isas = PyDict_New();
  for (int isa = MCMI_ISA_COUNT - 1; isas != NULL && isa >= 0; --isa) {
    PyObject *ok = PyBool_FromLong(mcmi_cpu_isa_supported((mcmi_isa)isa));
    if (PyDict_SetItemString(isas, mcmi_cpu_isa_name((mcmi_isa)isa), ok) < 0) {
      Py_DecRef(isas);
      isas = NULL;
    }
    Py_DecRef(ok);
  }
  return isas;
}

/* set_cpu_isa(name): the CPU kernels run that instruction set from now on;
 * ValueError for a name that is unknown or not supported here. */
static PyObject *set_cpu_isa(PyObject *self, PyObject *args) {
  (void)self;
  const char *name;
  if (!PyArg_ParseTuple(args, "s", &name)) {
    return NULL;
  }
  for (int isa = 0; isa < MCMI_ISA_COUNT; ++isa) {
    if (strcmp(name, mcmi_cpu_isa_name((mcmi_isa)isa)) == 0 &&
        mcmi_cpu_set_isa((mcmi_isa)isa) == MCMI_OK) {
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError,
               "'%s' is not an instruction set this CPU runs the kernels in",
               name);
  return NULL;
}

static PyMethodDef mcmi_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernels' instruction set."},
    {"cpu_isas", cpu_isas, METH_NOARGS,
     "{name: supported} for every instruction set of the CPU kernels."},
    {"set_cpu_isa", set_cpu_isa, METH_VARARGS,
     "Runs the CPU kernels in the named instruction set."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef mcmi_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Kernels of mcmi_torch (see torch.ops.mcmi).",
    -1,
    mcmi_methods,
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
