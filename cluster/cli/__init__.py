"""The `prefixcache` command: the parser (`main`), what each subcommand does (`commands`), the demo
(`demo`, `demo_chats`), batch files (`jsonl`) and SIGTERM handling for foreground commands
(`lifecycle`)."""
