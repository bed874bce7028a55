"""A process's own concerns, below everything: progress lines and bars (`progress`) and SIGTERM
remembered until the next batch (`interrupt`). No torch here."""
