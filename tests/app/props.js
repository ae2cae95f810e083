// Shared settings of the property tests.

/** Cases per property: FC_RUNS=100000 for a long local run. */
export const runs = Number(process.env.FC_RUNS ?? 2000);

// The code under test warns on the console of every bad message it drops,
// as it should in a browser; thousands of cases would bury the results.
console.warn = () => {};
