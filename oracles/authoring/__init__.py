"""Writing suites: the case kinds (kinds, cases, scenarios), what the suites hold (draws, suites,
edges), running refimpl in a precision (precision, emulate, modes, patching), the mutants,
calibrating tolerances (calibration) and writing a suite (writer, tokenizer).  Imports the
format layer and refimpl's forward pass; never the checking layer or an engine.
"""
