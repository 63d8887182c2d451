from worker.cli import console_script

console_script()
