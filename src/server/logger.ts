// The logger the server reports through. Libraries never print: the CLI injects one that
// writes to stderr (or syslog); tests inject one that records lines.

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export const SILENT_LOGGER: Logger = {
  info: () => {},
  warn: () => {},
  error: () => {},
};
