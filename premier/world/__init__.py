"""The synthetic preference world (issue 6): procedural prompts and user styles with ground truth."""
