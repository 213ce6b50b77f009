"""curate: per-token perplexity scoring and Selective Token Masking for LLM fine-tuning data.

The library's faces, imported lazily (the command line starts without torch):

    from curate import ChatTokenizer, make_engine, score_conversations, score_dataset, export_training_set
"""

__version__ = "0.1.0"

# name -> (module, attribute). Names that equal a submodule's (`export`, `evaluate`) would be
# shadowed by that submodule once imported, so those two are exported under longer names.
_EXPORTS = {
    "ChatTokenizer": ("curate.tokenize", "ChatTokenizer"),
    "make_engine": ("curate.engines", "make_engine"),
    "RunOptions": ("curate.pipeline", "RunOptions"),
    "Fields": ("curate.data", "Fields"),
    "EngineSettings": ("curate.engines.base", "EngineSettings"),
    "SamplingOptions": ("curate.engines.base", "SamplingOptions"),
    "RayEngines": ("curate.executors.ray", "RayExecutor"),
    "RayExecutor": ("curate.executors.ray", "RayExecutor"),
    "LocalExecutor": ("curate.executors.local", "LocalExecutor"),
    "RayOptions": ("curate.executors.ray", "RayOptions"),
    "score_conversations": ("curate.score", "score_conversations"),
    "score_dataset": ("curate.score", "score_dataset"),
    "generate_dataset": ("curate.generate", "generate_dataset"),
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
