"""Preset data: deepseek-v3.json, the published config (read by Config.preset("deepseek-v3"))."""
