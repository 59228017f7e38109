/*
 * module_cuda.c: the Python module `mcmi_torch._C_cuda`: importing it loads
 * this shared library, the CUDA kernels and their registration for the mcmi
 * ops (ops_cuda.cpp). It is a library of its own, linked against torch's CUDA
 * libraries, so that the core module `_C` also loads on a torch without
 * CUDA; mcmi_torch imports it only when torch has CUDA. Limited API only.
 */
#include <Python.h>

static struct PyModuleDef mcmi_cuda_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_C_cuda",
    .m_doc = "CUDA kernels of mcmi_torch (torch.ops.mcmi on CUDA tensors).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  return PyModule_Create(&mcmi_cuda_module);
}
