"""Strong views (intensity perturbations) and CutMix for the unlabeled stream."""
