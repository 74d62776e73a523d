import TallyPostgres

/// What accepting a log that lost counted records changes beside a group's offsets: the gaps
/// its consumers recorded (`tally.log_gaps`) and the credit signing horizon. Shared by
/// `tally check-log --keep` and `tally replay --promote`, in their transactions.
public enum LogLoss {
    /// Clears the gaps `group` recorded on these partitions: they may be read again.
    public static func clearGaps(group: String, topic: String, partitions: [Int32], on connection: PostgresConnection) throws {
        try connection.query("DELETE FROM tally.log_gaps WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])",
                             [group, topic, PostgresArray(partitions)])
    }

    /// Lowers each partition's credit signing horizon to where counting resumes: unsigned credit
    /// below it was accepted from the earlier log; records of this one from there on get no such
    /// allowance.
    public static func lowerCreditHorizon(topic: String, resumeAt: [Int32: Int64], on connection: PostgresConnection) throws {
        guard !resumeAt.isEmpty else { return }
        let partitions = resumeAt.keys.sorted()
        try connection.query("""
            UPDATE tally.unsigned_credit_horizon AS h SET signed_from_offset = least(h.signed_from_offset, x.next)
            FROM unnest($2::int[], $3::bigint[]) AS x(partition, next) WHERE h.topic = $1 AND h.partition = x.partition
            """, [topic, PostgresArray(partitions), PostgresArray(partitions.map { resumeAt[$0]! })])
    }
}
