"""Build the Cython featurizer, the factorized graph's row kernel, the best-row scan, the notice tokens' encoder, the first-price search, the AutoInt
attention kernel, row-wise Adam's row loops and the shared-memory all-gather's flags; everything else is declared in
pyproject.toml."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "bidder._features",
        ["bidder/_features.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "bidder._pricing",
        ["bidder/_pricing.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "bidder._rowkernel",
        ["bidder/_rowkernel.pyx"],
        depends=["bidder/_rowkernel.h"],
        include_dirs=["bidder"],
        # no errno from expf; -Wno-psabi: the 32-byte vector types only pass between inlined functions
        extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi"],
        libraries=["m"],
    ),
    Extension(
        "bidder._tokens",
        ["bidder/_tokens.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "bidder._shading",
        ["bidder/_shading.pyx"],
        extra_compile_args=["-O3"],
        libraries=["m"],
    ),
    Extension(
        "train._rows",
        ["train/_rows.pyx"],
        # no errno from sqrtf: the row loop's square roots vectorize
        extra_compile_args=["-O3", "-fno-math-errno"],
    ),
    Extension(
        "train.distributed._flags",
        ["train/distributed/_flags.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "train._attention",
        ["train/_attention.pyx"],
        depends=["train/_attention.h"],
        # -Wno-psabi: the 32-byte vector types only pass between inlined functions, never across an ABI
        extra_compile_args=["-O3", "-Wno-psabi"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
