#!/usr/bin/env node
/**
 * QwenChatModel: one call and one streamed reply, with the token managed by qwen-tokend.
 *
 *   npm run build && node examples/chat-model.mjs "Explain Unix sockets in two sentences"
 *
 * The daemon must be logged in (`qwen-token login`). Environment: the usual qwen-tokend
 * variables (QWEN_TOKEND_SOCKET, ...) pick the daemon; QWEN_MODEL picks the model (default coder-model).
 */
import { QwenChatModel, QwenTokenExpiredError, shutdown } from 'qwen-tokend';

const prompt = process.argv[2] ?? 'Say hello in one short sentence.';
const model = new QwenChatModel({ modelName: process.env.QWEN_MODEL ?? 'qwen-portal/coder-model' });

try {
  const { text, usage } = await model.call(prompt);
  console.log(`reply: ${text}`);
  console.log(`usage: ${usage?.total_tokens ?? '?'} tokens`);

  // Ctrl-C stops the stream and closes the connection.
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort());
  process.stdout.write('stream: ');
  for await (const delta of model.stream(prompt, { signal: controller.signal })) process.stdout.write(delta);
  process.stdout.write('\n');
} catch (err) {
  if (err instanceof QwenTokenExpiredError) console.error(`login needed: ${err.message}`);
  else console.error(err instanceof Error ? err.message : err);
  process.exitCode = 1;
} finally {
  await model.close();
  await shutdown();
}
