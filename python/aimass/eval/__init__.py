"""aimass.eval: metrics (scikit-learn's), latency through runtime.Session, k-fold
cross-validation, models side by side, PNG figures and report.json.

    rows = aimass.eval.compare({"fp32": "model.aimass", "int8": "int8.aimass"}, x_test, y_test)
    print(aimass.eval.table(rows)); aimass.eval.write("report/", rows, history)
"""
from .crossval import kfold
from .metrics import classification_metrics, latency, predict
from .report import compare, table, write

__all__ = ["classification_metrics", "predict", "latency", "kfold", "compare", "table", "write"]
