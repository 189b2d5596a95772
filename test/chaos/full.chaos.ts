/**
 * The reliability and security suite at full counts (200 kills, 500 rotations, 100,000 hostile
 * frames, ...): `npm run test:chaos` (vitest.chaos.config.ts). Not matched by `npm test`.
 */
import { defineChaosSuite } from './suite.js';
import { chaosScale } from './scale.js';

defineChaosSuite(chaosScale('full'));
