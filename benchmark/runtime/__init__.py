"""A process's own concerns, below everything: progress lines and bars (`progress`), SIGTERM
remembered until the next batch (`interrupt`) and which rank of a DDP cell it is (`ranks`). No
torch here."""
