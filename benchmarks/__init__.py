"""Named benchmark suites (``spinestream bench <suite>``): they print and save figures."""
