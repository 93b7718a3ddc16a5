"""Checking a candidate against a suite: worker (calls into an adapter, with timeouts),
candidates (output directories and Python adapters), check (compare, verdict, the report),
results (the typed results), report and report_html (text and HTML).  Imports the format layer
only: checking never imports refimpl's forward pass.
"""
