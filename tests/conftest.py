"""Test-wide settings. Hypothesis runs derandomised with no example database under ``make test``
(same examples every run, nothing written into the repository); ``make fuzz`` selects the long,
random profile (``DELTA_HYPOTHESIS_PROFILE=fuzz``), whose failures are kept in a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase

HOME = Path(tempfile.gettempdir()) / "delta-designer-hypothesis"
set_hypothesis_home_dir(str(HOME))  # its caches too go outside the repository

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile(
    "fuzz", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=DirectoryBasedExampleDatabase(str(HOME / "examples")))
settings.load_profile(os.environ.get("DELTA_HYPOTHESIS_PROFILE", "ci"))
