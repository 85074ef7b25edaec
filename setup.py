"""The build of tracemark's optional C core (tracemark/_speedups.c, and the reader's
tracemark/_reader.c, _reader_json.c); everything else is in pyproject.toml.

The extension is optional: a build without a compiler (or on a platform the C core does not
support) still succeeds and tracemark uses its pure-Python core, which stays the reference
(``tracemark --version`` and ``tracemark.env.core()`` say which core runs, and why).
"""

import sys
import sysconfig

from setuptools import Extension, setup

# Linux only: the C core reads CLOCK_MONOTONIC, which is time.monotonic_ns()'s clock there.
# A free-threaded build has no GIL, which the C core relies on: pure core there.
supported = sys.platform.startswith("linux") and not sysconfig.get_config_var("Py_GIL_DISABLED")

setup(
    ext_modules=[
        Extension(
            "tracemark._speedups",
            [
                "tracemark/_speedups.c",
                "tracemark/_speedups_consumer.c",
                "tracemark/_speedups_fire.c",
                "tracemark/_speedups_patching.c",
                "tracemark/_speedups_probes.c",
            ],
            depends=["tracemark/_speedups.h"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        # The reader's packet decoding (tracemark/_reader.c), optional on its own.
        Extension(
            "tracemark._creader",
            ["tracemark/_reader.c", "tracemark/_reader_json.c"],
            depends=["tracemark/_reader_lines.h"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
    if supported
    else [],
)
