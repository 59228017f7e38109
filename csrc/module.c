/*
 * module.c: an empty Python module, so that `import mcmi_torch._C` loads
 * this shared library and its op registrations. Limited API only: one build
 * serves every CPython >= 3.9.
 */
#include <Python.h>

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

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mcmi_module); }
