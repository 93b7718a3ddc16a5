"""oracles: golden-output suites for DeepSeek-V3 engines, and a checker with calibrated tolerances.

    oracles list     [--suite NAME]
    oracles generate --out DIR [--suite NAME] [--only GLOB]
    oracles check    GOLDEN [CANDIDATE | --adapter pkg.mod:factory] [--profile float32|bf16|fp8] [--json REPORT]
                     [--known KNOWN.toml] [--junit REPORT.xml]
    oracles verify   GOLDEN                  regenerate the expected values here and compare
    oracles diff     OLD.json NEW.json       what changed between two reports

A suite is a directory of cases (DESIGN.md section 6). Every expected value is computed by refimpl
in float64; tolerances per profile come from running refimpl itself in that precision.
"""

from refimpl.errors import RefimplError

__version__ = "0.1.0"


class OraclesError(RefimplError):
    """A user error (bad golden directory, bad candidate file, bad option): one sentence that
    names the file or case and the problem; the command line prints it and exits 2."""


__all__ = ["OraclesError", "__version__"]
