"""`flowerpot bench`: accuracy, framework overhead, scale, deployment cost and communication,
measured side by side on this machine and written up as JSON, Markdown and plots."""
