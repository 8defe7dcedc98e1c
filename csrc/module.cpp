// Python entry point of ssattn._C. Loading the library registers the
// torch ops (static registrars in alignment_op.cpp); this module only tells
// Python whether CUDA kernels were compiled in. Plain CPython API: no pybind11
// or torch/extension.h, which keeps the build fast.
#include <Python.h>

static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef SSATTN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef kMethods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels of ssattn._C were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of ssattn (registered as torch.ops.ssattn.*).", -1, kMethods,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
