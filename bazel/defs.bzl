"""Macros for jax_ep's BUILD: nvcc compilation and one py_test per file."""

load("@local_cuda//:defs.bzl", "CUDA_ARCHS", "CUDA_ENABLED", "NVCC")

def _include_flag(label, subdir):
    root = Label(label).workspace_root
    return "-I" + (root + "/" + subdir if root else subdir)

def cuda_objects(name, srcs, hdrs = [], header_deps = []):
    """Compiles each .cu file in srcs with nvcc (a genrule) into a cc_library.

    Flags mirror the CMake build: C++17, -O3, PIC, hidden visibility, code for
    CUDA_ARCHS (SASS + PTX), include dirs ffi/, XLA FFI, Python, nanobind.
    """
    gencode = " ".join([
        "-gencode=arch=compute_%s,code=[compute_%s,sm_%s]" % (a, a, a)
        for a in CUDA_ARCHS
    ])
    includes = " ".join([
        "-Iffi",
        _include_flag("@local_python//:BUILD", "xla_ffi_include"),
        _include_flag("@local_python//:BUILD", "python_include"),
        _include_flag("@local_python//:BUILD", "nanobind/include"),
    ])
    objs = []
    for src in srcs:
        base = src.split("/")[-1][:-len(".cu")]
        out = "_cuda_objs/%s/%s.o" % (name, base)
        native.genrule(
            name = "%s_%s_nvcc" % (name, base),
            srcs = [src] + hdrs + header_deps,
            outs = [out],
            cmd = ("TMPDIR=$(@D) %s -c $(location %s) -o $@ -std=c++17 -O3 -DNDEBUG " +
                   "-DJAX_EP_WITH_CUDA -Xcompiler=-fPIC,-fvisibility=hidden %s %s") % (
                NVCC,
                src,
                gencode,
                includes,
            ),
            message = "nvcc %s" % src,
        )
        objs.append(out)
    native.cc_library(
        name = name,
        srcs = objs,
        linkstatic = True,
        alwayslink = True,
    )

def jax_ep_py_tests(srcs, data = [], deps = [], env = {}, **kwargs):
    """One py_test per tests/test_*.py file, each running pytest on its file."""
    runner = "//bazel:pytest_main.py"
    for src in srcs:
        name = src.split("/")[-1][:-len(".py")]
        native.py_test(
            name = name,
            srcs = [runner],
            main = runner,
            args = ["$(location %s)" % src],
            data = [src] + [d for d in data if d != src],
            deps = deps,
            env = env,
            python_version = "PY3",
            srcs_version = "PY3",
            # Keep Bazel from creating __init__.py files in the runfiles tree.
            legacy_create_init = False,
            **kwargs
        )

def jax_ep_extension(name, module_src, cc_srcs, cu_srcs, hdrs):
    """The nanobind extension (a shared library named `name`, e.g. jax_ep/_C.so).

    Like the CMake build: with a detected CUDA toolkit and CUDA sources, the
    .cu files go through nvcc, the other .cc files are compiled with
    JAX_EP_WITH_CUDA, and cudart_static is linked in; otherwise only the
    module source is built (CPU-only extension).
    """
    use_cuda = CUDA_ENABLED and len(cc_srcs) + len(cu_srcs) > 0
    deps = [
        "@local_python//:nanobind",
        "@local_python//:python_headers",
        "@local_python//:xla_ffi_headers",
    ]
    srcs = [module_src] + [h for h in hdrs if not h.endswith(".cuh")]
    local_defines = []
    if use_cuda:
        cuda_objects(
            name = "ffi_cuda_objects",
            srcs = cu_srcs,
            hdrs = hdrs,
            header_deps = [
                "@local_python//:xla_ffi_header_files",
                "@local_python//:header_files",
            ],
        )
        srcs = srcs + cc_srcs
        deps = deps + [":ffi_cuda_objects", "@local_cuda//:cudart_static"]
        local_defines = [
            "JAX_EP_WITH_CUDA",
            "JAX_EP_CUDA_ARCHS=\\\"%s\\\"" % ",".join(CUDA_ARCHS),
        ]
    native.cc_binary(
        name = name,
        srcs = srcs,
        copts = ["-std=c++17", "-fvisibility=hidden", "-Iffi"],
        local_defines = local_defines,
        linkshared = True,
        linkopts = ["-Wl,--gc-sections"],
        deps = deps,
    )
