"""Build the Cython featurizer, the best-row scan and the first-price search; everything else is declared in pyproject.toml."""
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
        extra_compile_args=["-O3"],
    ),
    Extension(
        "bidder._shading",
        ["bidder/_shading.pyx"],
        extra_compile_args=["-O3"],
        libraries=["m"],
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
