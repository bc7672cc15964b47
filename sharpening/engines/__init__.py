"""Sampling engines: what turns prompts into N sampled responses each."""
