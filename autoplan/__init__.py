"""autoplan: plans and applies hybrid data/tensor/pipeline parallel training for PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import autoplan` stays free of torch
    if name == "search":  # the package, callable: autoplan.search(model, cluster=...)
        import autoplan.search

        return autoplan.search
    if name == "parallelize":
        from autoplan.executor import parallelize

        return parallelize
    if name == "auto":  # the module, callable: autoplan.auto(model, inputs, global_batch=8)
        import autoplan.app.auto

        return autoplan.app.auto
    raise AttributeError(f"module 'autoplan' has no attribute {name!r}")
