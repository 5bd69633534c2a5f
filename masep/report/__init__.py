# Every figure `masep report` writes, as figures/<name>.svg and .png, whatever the database holds
# (one without data says "not measured"): the workflow's report rule declares them as outputs,
# so a missing one renders the report again. Kept here, away from matplotlib, for the Snakefile.
PAGE_FIGURES = ("loss_curves", "throughput", "tpot")
SECTION_FIGURES = ("performance", "communication", "memory", "inference", "scaling", "cost_model", "energy",
                   "load_balance", "load_balance_metrics", "model_quality")
FIGURES = PAGE_FIGURES + SECTION_FIGURES
