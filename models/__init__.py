"""The model factory: builds every artifact anti_sus loads (CLIP export, GMM fit, watermark training/export)."""
