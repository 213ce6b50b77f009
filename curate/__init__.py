"""curate: per-token perplexity scoring and Selective Token Masking for LLM fine-tuning data.

The library's faces, imported lazily (the command line starts without torch):

    from curate import ChatTokenizer, ExportOptions, export_training_set, make_scorer, score_dataset
"""

__version__ = "0.1.0"

# name -> (module, attribute). Names that equal a submodule's (`export`, `evaluate`) would be
# shadowed by that submodule once imported, so those two are exported under longer names.
_EXPORTS = {
    "ChatTokenizer": ("curate.tokenize", "ChatTokenizer"),
    "make_scorer": ("curate.scoring.base", "make_scorer"),
    "score_dataset": ("curate.score", "score_dataset"),
    "generate_dataset": ("curate.generate", "generate_dataset"),
    "SamplingOptions": ("curate.generate", "SamplingOptions"),
    "HFGenerator": ("curate.generate", "HFGenerator"),
    "VLLMGenerator": ("curate.generate", "VLLMGenerator"),
    "export_training_set": ("curate.export", "export"),
    "ExportOptions": ("curate.export", "ExportOptions"),
    "evaluate_model": ("curate.evaluate", "evaluate"),
    "forgetting": ("curate.evaluate", "forgetting"),
    "ExperimentConfig": ("curate.experiment", "ExperimentConfig"),
    "run_experiment": ("curate.experiment", "run_experiment"),
    "resolve_model": ("curate.models", "resolve_model"),
    "load_tokenizer": ("curate.models", "load_tokenizer"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'curate' has no attribute {name!r}")
    import importlib

    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
