from coordinator.cli import console_script

console_script()
