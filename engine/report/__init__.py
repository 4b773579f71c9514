"""The paper's result tables from a runs directory: what ``mima report`` prints (and ``--json`` gives).

    from engine.report import collect_pairs, build_report
    report = build_report(collect_pairs("runs"))          # every finished attack pair
    report.to_dict()["tables"][0]["rows"][0]["cells"]     # MSGR per group, with the attack's success beside it

Numbers come only from metric events (see :mod:`engine.metrics.pairs`): those an attack run logged live, overridden by
later ``evaluate`` runs of the same pair (events tagged ``attack_run``). Events of randomly initialised backbones
(tag ``random_init``) are refused and listed under ``refused``.

Layout (the paper's Tables 1-3): one table per profile and attack family — *re-learning* (``lora``) and
*personalization* (the mean over the personalization attacks present: dreambooth, dreambooth-lora,
textual-inversion, custom-diffusion) — with rows immunization method x metric, columns the groups (2-concept
groups, then 3-concept groups, ...) and their average; an MRSGR table of the same shape. Each cell carries the
attack's success on the unimmunized twin (``success/judge-acc``: the judge's accuracy on x^A), without which an
MSGR means little. The ``none`` row is the control of :mod:`engine.attacks.pairs` (the unimmunized model attacked
twice with the same seeds: 0 when the attack is deterministic).

Beside them, per profile, a *utility* table (:class:`UtilityTable`, from each immunization run's utility
measurement, :mod:`engine.metrics.utility`): rows base, parent and each method, cells the primary utility of the
targets and of the other concepts without attack. A method whose model is collapsed in a group has ``collapsed`` set
on its cells of every table, so no number of a model that no longer draws reads as immunization. A *learnability*
table (kind ``learn``) shows the other concepts' attack success on the immunized model beside the twin's, and an
*immunity* table (kind ``immune``) the targets' accuracy after the attack beside the twin's; its average counts only
the groups where the attack teaches the twin (``IMMUNE_TWIN_MIN``).

Reported step: ``step`` if given, else the last attack step each pair has MSGR events for.

Modules: :mod:`~engine.report.pairs` (the pairs and their events), :mod:`~engine.report.tables` (the tables) and
:mod:`~engine.report.grid` (the qualitative figure).
"""

from __future__ import annotations

from .grid import qualitative_grid
from .pairs import METHOD_ORDER, METRIC_ORDER, PairSummary, collect_pairs, family_of
from .tables import (Cell, Report, Row, Table, UtilityCell, UtilityRow, UtilityTable, build_report,
                     mean_if_finite)

__all__ = ["PairSummary", "Cell", "Row", "Table", "UtilityCell", "UtilityRow", "UtilityTable", "Report",
           "collect_pairs", "build_report", "family_of", "qualitative_grid", "METHOD_ORDER", "METRIC_ORDER",
           "mean_if_finite"]
