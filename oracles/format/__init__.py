"""The suite format: what a golden suite is on disk and how it is read as untrusted input.

schema (the Case record, output types), untrusted (reading files from a suite safely), manifest
(validating manifest.json), golden (the Golden reader), metrics (the comparisons), tolerances
(the profiles' constants), schedule (a serving schedule checked and unrolled), candidate (a
candidate directory read as untrusted input, and the error.txt `oracles run` writes for a case the
engine refused).  Nothing here computes an output or imports refimpl's forward pass; this layer
imports no other layer of oracles/.
"""
