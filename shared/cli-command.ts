/**
 * How a person runs `qwen-token` from where they are, so that advice in messages names a
 * command that works: a checkout has no `qwen-token` on PATH until `npm link`.
 */
import { accessSync, constants, statSync } from 'node:fs';
import { delimiter, join, relative, isAbsolute } from 'node:path';
import { packageRoot } from './package.js';

export interface CliCommandContext {
  /** For PATH (default `process.env`). */
  env?: NodeJS.ProcessEnv;
  /** Where the person is (default `process.cwd()`). */
  cwd?: string;
  /** The package's root (default: this package's). */
  root?: string;
}

function isExecutableFile(path: string): boolean {
  try {
    if (!statSync(path).isFile()) return false;
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function isInside(dir: string, root: string): boolean {
  const rel = relative(root, dir);
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel));
}

/** The two programs of this package, and the npm script that runs each in its checkout. */
const PROGRAMS = {
  'qwen-token': { script: 'npm run cli --', bundle: 'qwen-token.js' },
  'qwen-tokend': { script: 'npm start', bundle: 'qwen-tokend.js' },
} as const;

export type Program = keyof typeof PROGRAMS;

/**
 * The command that runs `program` here, first match wins: its name when it is on PATH
 * (installed globally, or `npm link`ed); its npm script inside this package's own checkout
 * (`npm run cli --`, `npm start`); `npx <name>` in a project that has it in node_modules/.bin;
 * else `node <absolute path of its bundle>`, which works from anywhere.
 */
export function resolveCommand(program: Program, context: CliCommandContext = {}): string {
  const env = context.env ?? process.env;
  const cwd = context.cwd ?? process.cwd();
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir !== '' && isExecutableFile(join(dir, program))) return program;
  }
  let root: string;
  try {
    root = context.root ?? packageRoot();
  } catch {
    return program;
  }
  if (isInside(cwd, root)) return PROGRAMS[program].script;
  if (isExecutableFile(join(cwd, 'node_modules', '.bin', program))) return `npx ${program}`;
  return `node ${join(root, 'dist', 'bin', PROGRAMS[program].bundle)}`;
}

const cached = new Map<Program, { key: string; command: string }>();

function commandHere(program: Program): string {
  const key = `${process.env.PATH ?? ''}\0${process.cwd()}`;
  let entry = cached.get(program);
  if (entry?.key !== key) {
    entry = { key, command: resolveCommand(program) };
    cached.set(program, entry);
  }
  return entry.command;
}

/**
 * `qwen-token <args>` in the form that works for this process's PATH and working directory,
 * e.g. `qwen-token login` or `npm run cli -- login`. Looked up once per PATH and directory.
 */
export function cliCommand(args: string): string {
  return `${commandHere('qwen-token')} ${args}`;
}

/** The command that runs the daemon in the foreground here: `qwen-tokend`, `npm start`, ... */
export function daemonCommand(): string {
  return commandHere('qwen-tokend');
}
