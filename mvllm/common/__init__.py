"""What the router, the agent and the dashboard share: config loading, errors, metrics parsing."""
