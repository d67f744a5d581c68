"""Alert rules on health signals: rule model, detectors, evaluator, sinks, YAML packs."""
