"""Helpers shared by several test files (imported as `helpers.<subject>`; tests/ is on sys.path)."""
