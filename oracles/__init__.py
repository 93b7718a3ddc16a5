"""oracles: golden-output suites for DeepSeek-V3 engines, and a checker with calibrated tolerances.

    oracles list     [--suite NAME]
    oracles generate --out DIR [--suite NAME] [--only GLOB]
    oracles check    GOLDEN [CANDIDATE | --adapter pkg.mod:factory] [--profile float32|bf16|fp8] [--json REPORT]
                     [--known KNOWN.toml] [--junit REPORT.xml]
    oracles verify   GOLDEN                  regenerate the expected values here and compare
    oracles diff     OLD.json NEW.json       what changed between two reports

A suite is a directory of cases (DESIGN.md section 6). Every expected value is computed by refimpl
in float64; tolerances per profile come from running refimpl itself in that precision.

The package is in layers that import downward only (tests/oracles/test_imports.py checks it):

    format/     the suite on disk: schema, untrusted reading, manifest, the Golden reader, metrics,
                the tolerance profiles
    checking/   the checker: worker, candidates, compare and verdict, typed results, reports
    authoring/  writing suites: case kinds, draws, suites, edges, scenarios, emulated precisions
                and engine modes, mutants, calibration, the writer
    engines/    adapters for real engines and for refimpl itself (reference.py), the engine matrix
    cli.py      the command line; adapters.py, mutants.py, hf_adapter.py keep the `--adapter`
                names the docs use

format imports nothing else of oracles/; checking and authoring import format only; engines
import all three; checking never imports refimpl's forward pass.
"""

from refimpl.errors import RefimplError

__version__ = "0.1.0"


class OraclesError(RefimplError):
    """A user error (bad golden directory, bad candidate file, bad option): one sentence that
    names the file or case and the problem; the command line prints it and exits 2."""


__all__ = ["OraclesError", "__version__"]
