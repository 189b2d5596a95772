/**
 * The reliability and security suite at reduced counts (seconds per scenario), as part of
 * `npm test`. `npm run test:chaos` runs the same scenarios at full counts (test/chaos/full.chaos.ts).
 */
import { defineChaosSuite } from './chaos/suite.js';
import { chaosScale } from './chaos/scale.js';

defineChaosSuite(chaosScale('reduced'));
