"""Helpers shared by several test modules and the bench scripts: no tests here."""
