"""Preference data: who wins on which query, the input every router learns from.

    from rayeval.prefs import Outcomes, Preferences, load_source
    load_source("routellm:mmlu")          # or routerbench:<task>, battles:<jsonl>, eval:<rows.parquet>, a parquet

``outcomes``: the two tables (per-model scores, pairwise battles) and their builders from rayeval
eval rows, RouteLLM, RouterBench and arena battles; ``sources``: the one parser of source
strings; ``generate`` / ``judge``: new responses and LLM-as-judge labels on the shared runtime;
``similarity``: how close a benchmark's queries are to the ones a router was trained on;
``cli``: ``rayeval augment``.
"""

from rayeval.prefs.outcomes import Outcomes, Preferences  # noqa: F401
from rayeval.prefs.sources import load_outcomes, load_source, parse_source  # noqa: F401
