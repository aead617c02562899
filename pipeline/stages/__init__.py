"""Stages: ingest, decode, scan, dedupe, junk, classify, output.

Rule: a stage imports the output contract, ``ops``, ``models`` and lower
stages, never a runner and never a stage that comes after it in the night;
only ``pipeline.runners`` knows the order.
"""
