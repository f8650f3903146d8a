"""Test-session settings, applied before any test module imports crossent."""
import os

# impl="auto" picks numba from the first call on (no torch stand-in while numba loads in the
# background): results do not depend on how fast the load was. The background load itself is
# tested in a fresh process (tests/test_numba_backend.py).
os.environ.setdefault("CROSSENT_BACKGROUND_LOAD", "0")
