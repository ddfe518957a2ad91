"""sparsecc: a sparsity compiler for PyTorch.

``torch.compile(model, backend="sparsecc", options={"spec": "llama.toml"})``
finds attention, FFN and linear sites in the captured graph, decides per site
(spec rule + cost model) whether a sparse form pays off, rewrites the chosen
sites into ``torch.ops.sparsecc`` ops and hands the rest to Inductor.

Public names: ``compile``, ``explain``, ``calibrate``, ``refresh``, ``tune``, ``load_spec``, ``Spec``,
``SpecError``, ``SparseccWarning``, ``Report``, ``last_report``, ``gather_reports`` (tensor parallelism).
"""

from sparsecc.api import calibrate, compile, explain, refresh
from sparsecc.backend import SparseccWarning, last_report
from sparsecc.distributed import gather_reports
from sparsecc.report import Report, SiteRecord
from sparsecc.spec import Spec, SpecError, load_spec
# The subpackage itself is callable (``sparsecc.tune(model, batches, ...)``) and also holds ``cli_main``.
from sparsecc import tune

__all__ = ["compile", "explain", "calibrate", "refresh", "tune", "load_spec", "Spec", "SpecError", "SparseccWarning", "Report",
           "SiteRecord", "last_report", "gather_reports"]
__version__ = "0.1.0"
