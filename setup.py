"""Build the one native helper (edge/_native/nested.c): a plain C library loaded with ctypes.

Everything else about the package is in pyproject.toml. If no C compiler is present the build
still succeeds without it and edge uses the numpy implementation of the same function.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler: edge falls back to numpy
            print(f"warning: edge's native helper was not built ({e}); using numpy")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: edge's native helper was not built ({e}); using numpy")


setup(
    ext_modules=[Extension("edge._native._nested", ["edge/_native/nested.c"],
                           extra_compile_args=["-O3"], py_limited_api=False)],
    cmdclass={"build_ext": OptionalBuildExt},
)
