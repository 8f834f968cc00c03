"""nrrdd: NRR-DD dataset distillation."""
import os as _os

__version__ = "0.1.0"

# In an installed wheel the Triton kernels are the subpackage nrrdd/kernels. In a source checkout they live
# in the top-level folder kernels/ beside nrrdd/ (setuptools' package-dir maps them at install time); when
# Python imports nrrdd from the checkout itself (e.g. `python -m benchmarks` from the repository root),
# let nrrdd.kernels resolve to that folder.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_here, _os.pardir, "kernels", "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # type: ignore[name-defined]  # noqa: F821
