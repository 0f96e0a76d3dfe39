// A C++ extension that compiles in well under a second (no torch headers), for the tests of
// lmtrain.kernel_build: `answer()` returns ANSWER, so a test can tell two builds apart.
#include <Python.h>

#ifndef ANSWER
#define ANSWER 42
#endif
#define JOIN2(a, b) a##b
#define JOIN(a, b) JOIN2(a, b)
#define TEXT2(x) #x
#define TEXT(x) TEXT2(x)

static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }

static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "The number this build was made with."},
                                {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, TEXT(TORCH_EXTENSION_NAME), nullptr, -1, methods};

PyMODINIT_FUNC JOIN(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&definition); }
