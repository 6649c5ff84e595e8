"""Builders of the collections that ship with the repository (`make data`); outside the library."""
