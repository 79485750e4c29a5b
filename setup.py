"""Cython extensions; everything else is declared in pyproject.toml.

fastpath/ is one extension module (uvloop's layout): _fast.pyx `include`s each unit's .pyx, so units
call each other through C and no cross-module cimport is needed under package-dir mapping.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("nodemesh.fastpath._fast", ["fastpath/_fast.pyx"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
