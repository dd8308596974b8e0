"""Caption synthesis (SynCLR): prompts from concept lists -> a language model (or rules) -> caption rows."""
