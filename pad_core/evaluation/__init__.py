"""Verifiable checks of whether an answer follows a preference, the eval
data set format, and the statistics `pad eval` reports. No HTTP here."""
